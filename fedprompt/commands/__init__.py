"""The CLI layer's commands that have no lower home: ``fedprompt distill`` and ``fedprompt transfer``
(:mod:`fedprompt.commands.post`). ``fedprompt.cli`` dispatches to them; nothing below the CLI layer imports
this package (docs/architecture.md; ``lint-imports`` checks it)."""
