"""CLI commands, one module each, with

    HELP                   one line for `tunelab --help`
    DESCRIPTION            the paragraph of `tunelab COMMAND --help`
    add_arguments(parser)  the command's arguments (shared ones from `arguments.py`)
    run(args) -> int       the command; its result goes to stdout with print (tunelab/console.py)

`tunelab.cli` adds each to the parser under its module's name."""
