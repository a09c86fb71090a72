"""jobtree services: one package per service, each a thin `main(ctx)` around the core and the bus.

Each `services/<name>/` is importable as `jobtree.services.<name>` and started as
`jobtree serve NAME`. Services never import each other (an import-linter contract).
"""
