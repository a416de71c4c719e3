"""The application on top of the tuner and the trainers: the paper's tasks, the end-to-end pipeline and its search,
the ``lofit`` command line, the embedded default model, the base-metrics cache and publishing to the Hub."""
