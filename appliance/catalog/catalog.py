"""The catalog facade: one object over the catalog's repositories, as every caller uses it.

The catalog is an SQL index of assets, stores and their locations, recovery points and their
copies, jobs, policies and accounts. It is never the only record of anything that matters:
every store is self-describing, and `catalog rebuild` recreates the catalog's view of a store
with :meth:`Catalog.replace_store_points`. What the catalog alone knows (jobs, their logs, the
audit trail, verification times) is operational history, not data.

Design: one :class:`database.Database` (engine, clock, transactions, schema upgrades) shared by
one small repository class per aggregate -- ``assets``, ``locations`` (stores, locations, pools,
media), ``points``, ``copies``, ``jobs``, ``schedules`` (policies, schedule state, settings),
``accounts`` (users, sessions, tokens, audit) and ``failovers``. :class:`Catalog` is all of them
at once (it inherits each repository class, which share nothing but the database object and have
no method names in common), so ``catalog.add_point(...)`` is :meth:`PointRepository.add_point`
without a hand-written delegate per method. Each repository method documents its contract; each
runs in its own short transaction and returns frozen records (``records``).
"""

from __future__ import annotations

from types import TracebackType

from sqlalchemy import Engine

from appliance.catalog.accounts import AccountRepository
from appliance.catalog.alerts import AlertRepository
from appliance.catalog.assets import AssetRepository
from appliance.catalog.copies import CopyRepository
from appliance.catalog.database import HEAD_REVISION, MIGRATIONS_DIR, Clock, Database
from appliance.catalog.failovers import FailoverRepository
from appliance.catalog.jobs import JobRepository
from appliance.catalog.locations import LocationRepository
from appliance.catalog.plans import PlanRepository
from appliance.catalog.points import MIN_POINT_PREFIX, PointRepository
from appliance.catalog.schedules import ScheduleRepository
from appliance.catalog.tape import TapeRepository

__all__ = ["HEAD_REVISION", "MIGRATIONS_DIR", "MIN_POINT_PREFIX", "Catalog", "Clock"]


class Catalog(
    AssetRepository,
    LocationRepository,
    PointRepository,
    CopyRepository,
    JobRepository,
    ScheduleRepository,
    AccountRepository,
    FailoverRepository,
    AlertRepository,
    PlanRepository,
    TapeRepository,
):
    """The catalog of one appliance. Open with :meth:`open`; close with :meth:`close`.

    Thread-safe: every method takes its own connection from the engine's pool.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._db = db  # what every repository's methods use

    @classmethod
    def open(cls, url: str, *, clock: Clock | None = None) -> Catalog:
        """Connect to the catalog at ``url`` and bring its schema up to date.

        ``url`` is an SQLAlchemy URL: ``sqlite:////var/lib/appliance/catalog.db`` (the directory
        must exist; the file is created) or ``postgresql+psycopg://user@host/dbname`` (the
        database must exist). ``clock`` returns the current aware datetime; it defaults to UTC
        wall-clock time.
        """
        return cls(Database.open(url, clock=clock))

    @property
    def url(self) -> str:
        """The URL this catalog was opened with (password included: it opens it again)."""
        return self.db.url

    @property
    def _engine(self) -> Engine:
        return self.db.engine

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
