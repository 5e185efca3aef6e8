"""Cron expressions as the appliance takes them: five fields, read by croniter.

One check for the policies' schedules and the store's verify schedule, so both refuse the same
expressions with the same words.
"""

from __future__ import annotations

from datetime import UTC, datetime

from croniter import CroniterBadDateError, croniter

from appliance.errors import InvalidInput


def check_cron(expression: object) -> str:
    """``expression`` normalised (single spaces) if it is a five-field cron that ever fires."""
    if not isinstance(expression, str):
        raise InvalidInput("a cron expression must be a string")
    fields = expression.split()
    if len(fields) != 5:
        raise InvalidInput(
            f"cron expression {expression!r} needs five fields: minute hour day month weekday"
        )
    text = " ".join(fields)
    try:
        valid = croniter.is_valid(text)
        if valid:
            # An expression can be well-formed and still never fire (30 February).
            croniter(text, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except CroniterBadDateError:
        raise InvalidInput(f"cron expression {text!r} never fires") from None
    except Exception:  # croniter raises assorted errors on odd input; all mean "invalid"
        valid = False
    if not valid:
        raise InvalidInput(f"{expression!r} is not a valid cron expression")
    return text
