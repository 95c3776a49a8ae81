"""Studies built on gptlab, one folder each (as big_vision's `proj/`): a study's sweep config, its analysis
and its report writer live together, and adding a study never touches the library.

    python -m experiments.study --config=projects/NAME/config.py[:PRESET] --workdir=DIR

runs the study's sweep and then the report writer its config names (`study["report"]`, a module with
`write_study(directory)`).
"""
