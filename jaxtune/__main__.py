"""python -m jaxtune COMMAND [ARGS]: the `jaxtune` command (jaxtune/commands)."""

from jaxtune.commands import main

main()
