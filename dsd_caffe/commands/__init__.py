"""The command-line tools, one module each: its docstring is its ``--help``, its ``main()`` parses the flags, makes
one library call and prints the result. Installed as console scripts (``dsd-prune``, ``dsd-run``, ...; see
setup.py) and run by the repository's ``tools/*.py`` as well. Flag groups shared by several tools are in
:mod:`.flags`; the shell (errors, exit status, vocabulary helpers) is :mod:`dsd_caffe.cli`."""
