"""TFDS catalog datasets (tiny_shakespeare, lm1b, wikipedia/..., c4/..., imdb_reviews, ...) by name.

Prepared once as `array_record` and read through `tfds.data_source`, like the
project's own builders. Many catalog builders need TensorFlow to *prepare* data
(they read their downloads with `tf.io.gfile`): TensorFlow is the optional
`tf` extra (`pip install -e ".[tf]"`, tensorflow-cpu), imported only when a
catalog dataset has to be prepared (or was prepared elsewhere in a format
without random access), and always with every accelerator hidden from it, so
it never takes GPU or TPU memory from JAX.

Offline: a builder looks for each file it would download in `data.manual_dir`
under the name its registered checksums give (`input.txt` for
tiny_shakespeare). When a file is neither there, nor in the TFDS download
cache, nor reachable over the network, preparation stops at once with one line
saying which file to put into which directory.
"""
import functools
import os
import socket
import sys
import urllib.parse

import tensorflow_datasets as tfds

from gptlab.errors import UserError

TF_EXTRA = "pip install -e \".[tf]\" (tensorflow-cpu)"


@functools.cache
def import_tensorflow():
    """TensorFlow with only CPUs visible, or None when the `tf` extra is not installed."""
    # No start-up banners: TensorFlow only reads files here, so its oneDNN kernels are not needed.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    try:
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    hide_accelerators(tf)
    return tf


def hide_accelerators(tf) -> None:
    """Makes TensorFlow see CPUs only (GPUs, TPUs and plugged-in devices hidden), before it touches them."""
    physical = tf.config.list_physical_devices()
    cpus = [d for d in physical if d.device_type == "CPU"]
    try:
        tf.config.set_visible_devices(cpus)
    except RuntimeError:  # TensorFlow was initialised before gptlab imported it
        visible = [d.name for d in tf.config.get_visible_devices() if d.device_type != "CPU"]
        if visible:
            raise UserError(f"TensorFlow was initialised with accelerators visible ({visible}) before gptlab could "
                            "hide them, so it would take memory from JAX: do not use TensorFlow before gptlab "
                            "prepares the dataset, or prepare it in a separate process") from None


def make_builder(name: str, data_dir) -> tfds.core.DatasetBuilder:
    """The catalog builder `name` (with its config and version, e.g. `wikipedia/20230601.en`)."""
    try:
        builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        if "tensorflow" in sys.modules:  # a builder module imported it: hide accelerators before first use
            import_tensorflow()
        return builder
    except UserError:
        raise
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(f"unknown data.dataset={name!r}: use python_stdlib, text_folder or a TFDS catalog "
                        "name (see `tfds.list_builders()`)") from None
    except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"cannot load TFDS dataset {name!r}: {first_line(e)}") from None


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _default_dirs(builder, manual_dir):
    download_dir = builder.data_dir_root / "downloads"
    return download_dir, (os.path.expanduser(manual_dir) if manual_dir else str(download_dir / "manual"))


def missing_files(builder, manual_dir) -> list:
    """(url, url_info) of the registered files found neither in `manual_dir` nor in the download cache."""
    download_dir, manual_dir = _default_dirs(builder, manual_dir)
    try:
        url_infos = dict(builder.url_infos or {})
    except Exception:  # pylint: disable=broad-except  (builders without a checksums file)
        return []
    missing = []
    for url, info in url_infos.items():
        if info.filename and os.path.exists(os.path.join(manual_dir, info.filename)):
            continue
        try:
            fname = tfds.core.download.resource.get_dl_fname(url, info.checksum)
            if (download_dir / fname).exists():
                continue
        except Exception:  # pylint: disable=broad-except
            pass
        missing.append((url, info))
    return missing


def reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the URL's host opens: a quick probe instead of minutes of retries."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return True  # not ours to judge (e.g. gs://); let TFDS try
    try:
        socket.create_connection((parsed.hostname, parsed.port or (443 if parsed.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


def manual_dir_message(builder, manual_dir, missing) -> str:
    _, where = _default_dirs(builder, manual_dir)
    head = (f"dataset {builder.info.full_name!r} is not prepared in {builder.data_dir_root} and cannot be "
            "downloaded (no network)")
    if len(missing) > 10:  # e.g. wikipedia: the checksums list every dump of every language
        return (f"{head}: its builder lists {len(missing):,} download files; prepare it on a machine with network "
                f"access and point data.data_dir at that data dir, or put the files it needs into {where}")
    url, info = missing[0]
    name = info.filename or os.path.basename(urllib.parse.urlparse(url).path)
    more = f" (and {len(missing) - 1} more file(s) the builder lists)" if len(missing) > 1 else ""
    return (f"{head}: put {name} ({info.size:,} bytes, sha256 {info.checksum[:12]}..., from {url}) into "
            f"{where}{more}, or set --config.data.manual_dir to the directory that holds it")


def prepare(builder, manual_dir) -> None:
    """Downloads (or takes from `manual_dir`) and prepares a catalog dataset; a no-op when prepared."""
    if builder.is_prepared():
        return
    missing = missing_files(builder, manual_dir)
    if missing and not reachable(missing[0][0]):
        raise UserError(manual_dir_message(builder, manual_dir, missing))
    import_tensorflow()  # before TFDS imports it for the builder: accelerators hidden
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    try:
        builder.download_and_prepare(download_config=download_config)
    except UserError:
        raise
    except Exception as e:  # pylint: disable=broad-except
        where = f"cannot prepare dataset {builder.info.full_name!r} in {builder.data_dir_root}"
        if _needs_tensorflow(e):
            raise UserError(f"{where}: its TFDS builder needs TensorFlow, which is not installed: {TF_EXTRA}, "
                            "or prepare it on another machine and point data.data_dir at it") from None
        if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
            steps = " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
            raise UserError(f"{where}: it needs files you download yourself into data.manual_dir "
                            f"({_default_dirs(builder, manual_dir)[1]}): {steps[:300]}") from None
        raise UserError(f"{where}: {first_line(e)}. Without network access, put the files the builder downloads "
                        "into data.manual_dir, or prepare it on a machine with network access and point "
                        "data.data_dir at it") from None


def _needs_tensorflow(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, ImportError) and "tensorflow" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def has_random_access(builder) -> bool:
    formats = builder.info.available_file_formats() if hasattr(builder.info, "available_file_formats") else set()
    formats = formats or {builder.info.file_format}
    return bool(set(formats) & set(tfds.core.file_adapters.FileFormat.with_random_access()))


def iterate_numpy(builder, split: str):
    """Examples of a dataset prepared without random access (e.g. tfrecord, from GCS): read with TensorFlow."""
    if import_tensorflow() is None:
        raise UserError(f"dataset {builder.info.full_name!r} in {builder.data_dir} is stored as "
                        f"{builder.info.file_format.value}, which only TensorFlow reads: {TF_EXTRA}, or prepare "
                        "it again as array_record in an empty data.data_dir")
    return tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False))
