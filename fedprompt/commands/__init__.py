"""The CLI layer's commands: what ``fedprompt <command>`` runs. ``fedprompt.cli`` parses and dispatches to them;
nothing below the CLI layer imports this package (docs/architecture.md; ``lint-imports`` checks it).

- ``run`` (:mod:`.run`): checks, the run folder, ``flwr run`` of the Flower app (:mod:`.launch`), resume;
  its processes are stopped as one (:mod:`.tree`) and its end recorded in status.json (:mod:`.status`);
- ``run -m`` / Hydra sweeps (:mod:`.hydra_app`);
- ``deploy`` (:mod:`.deploy`): a local SuperLink and SuperNodes, each with its own partition folder
  (``partition``, :mod:`.partition`);
- ``distill`` and ``transfer`` (:mod:`.post`).
"""
