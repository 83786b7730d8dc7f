"""``python -m kdcache.student ...`` is ``kdtrain ...`` (the study runs its arms this way, with the
interpreter that runs it, whatever is on PATH)."""

from kdcache.cli import train_app

train_app(prog_name="kdtrain")
