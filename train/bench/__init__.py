"""`python -m train.bench loader|scale|gpu`: benchmarks that need torch, each printing figures measured in one
run (speed targets live here, never in tests). The command is __main__; the modules are its parts."""
