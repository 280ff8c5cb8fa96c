"""What a user writes and what it builds: the YAML schemas of experiments, sweeps and studies, the builders
that turn a config into objects, datasets, teachers, and the checks that run before any work starts
(`check_config`, static; `check_environment`, data, storage and teachers)."""
