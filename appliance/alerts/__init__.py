"""Alerts: events that reach a person, decided by pure functions of records and an explicit ``now``.

- :mod:`~appliance.alerts.events`: the event kinds (with their default severity) and the event
  record every source raises; constructors for the events raised one at a time (a job failed,
  a ransomware warning, a test alert).
- :mod:`~appliance.alerts.rules`: a rule per event kind (enabled, severity, channels, repeat
  interval), the repeat-suppression decision and the delivery retry backoff.
- :mod:`~appliance.alerts.evaluate`: the conditions checked periodically (a missed schedule, a
  missed RPO, a lost copy, a pool degraded or filling, a USB disk overdue, a certificate about
  to expire), each a pure function of plain records and ``now``.

Storing alerts (``appliance.catalog``), sending them (``api.alert_channels``) and raising them
from the running service (``api.alerting``) are adapters around this core.
"""
