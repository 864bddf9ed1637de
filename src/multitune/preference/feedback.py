"""``--data feedback:BANK --task T``: the served task's human feedback as the training data of ``kto``, ``dpo``
and ``reward``, read from the server's store without an export file (the seeds' loop: RLHF "with rewards from
iterative human evaluations of the outputs").

``BANK`` is what ``multitune feedback export`` and ``update --data feedback:BANK`` take: the first folder
``multitune serve`` served (its ``monitor.sqlite``; ``--monitor-db URL_OR_FILE`` for the store the servers
shared), or the store itself, a SQLite file or a ``postgresql://`` URL. KTO reads
every rating (and every correction, desirable) as an unpaired row; DPO and the reward model read the corrections
as pairs (the correction chosen over the served answer); :func:`multitune.health.export.preference_rows` builds
both, as ``feedback export --preferences`` writes them. When ``BANK`` is a folder that holds task ``T``, the
policy starts from T's served adapter (``--init-adapter`` overrides it), so the next version improves on what
users rated.
"""

from __future__ import annotations

from pathlib import Path

from multitune.errors import ConfigError, DataError
from multitune.preference.kto import Unpaired
from multitune.preference.pairs import Pair

PREFIX = "feedback:"


def is_feedback(data: str | None) -> bool:
    return bool(data) and str(data).startswith(PREFIX)


def source(data: str) -> str:
    """What follows ``feedback:``: a served folder, a SQLite file or a ``postgresql://`` URL."""
    where = str(data)[len(PREFIX) :]
    if not where:
        raise ConfigError(
            "--data feedback: names no store; give feedback:BANK (the folder `multitune serve` served) or "
            "feedback:URL_OR_FILE (its --monitor-db)"
        )
    return where


def _open(where: str):  # noqa: ANN202  (a FeedbackStore: imported late, the store pulls in sqlite/psycopg)
    from multitune.health.feedback_cli import open_store
    from multitune.health.store import FeedbackStore

    if Path(where).is_dir():
        return open_store(where, None)
    if where.startswith(("postgresql://", "postgres://")):
        return FeedbackStore.open(where)
    if not Path(where).is_file():
        raise ConfigError(
            f"feedback store {where}: no such folder or file; give the folder `multitune serve` served or "
            "its --monitor-db (a SQLite file or a postgresql:// URL)"
        )
    return FeedbackStore.open(where)


def load_feedback(
    data: str, task: str, paired: bool, monitor_db: str | None = None
) -> list[Pair] | list[Unpaired]:
    """Task ``task``'s feedback as DPO pairs (``paired``) or KTO rows; one clear line when there are none.
    ``monitor_db``: the store the servers shared (``update``'s flag of the same name), else BANK's own."""
    from multitune.health.export import preference_rows

    store = _open(monitor_db or source(data))  # an existing store only: a typo never creates an empty one
    again = f" --monitor-db {monitor_db}" if monitor_db else ""
    try:
        rows = store.rows(task)
        if rows and rows[0]["kind"] != "generation":
            raise ConfigError(
                f"task '{task}' is a {rows[0]['kind']} task; preference training reads a generation task's "
                f"ratings (its labels are training data: multitune feedback export {source(data)} --task {task}"
                f"{again} --output new.csv)"
            )
        unpaired, pairs = preference_rows(store, task)
    finally:
        store.close()
    if not paired:
        return [Unpaired(r["prompt"], r["completion"], bool(r["label"])) for r in unpaired]
    if not pairs:
        raise DataError(
            f"task '{task}' has {len(unpaired)} rated answers but no correction, so no pair to train on; train "
            f"KTO on the ratings: multitune kto --data {data} --task {task}{again}"
        )
    return [Pair(r["prompt"], r["chosen"], r["rejected"]) for r in pairs]


def served_adapter(data: str, task: str) -> Path | None:
    """The adapter the server serves as ``task`` when ``feedback:BANK`` names a folder that holds it."""
    from multitune.serve.engine import find_adapters

    where = Path(source(data))
    if not where.is_dir():
        return None
    try:
        return find_adapters(where).get(task)
    except ConfigError:
        return None
