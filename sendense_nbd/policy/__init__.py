"""Backup policies, pure: what to back up, when (cron or interval slots) and what to keep (GFS).

No asyncio, sockets, SQLite or clock reads here: every function that needs
the time takes ``now`` (epoch seconds), so the hub's scheduler and
retention are tested by property over simulated months.
"""
