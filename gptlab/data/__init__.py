"""Datasets (TFDS builders of the project's own) and the input pipeline."""
from gptlab.data.corpora import PythonStdlib, TextFolder  # registers the builders with TFDS
from gptlab.data.pipeline import Data, WindowBatches, make_builder, prepare, read_texts, tokenize_documents
