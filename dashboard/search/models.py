"""The search index: one row of text per recorded event worth finding (prompts, what the
agent said, tool inputs and outputs, final results). The full-text structures live beside
this table and differ per database: an FTS5 table kept in step by triggers on SQLite, a GIN
expression index on PostgreSQL (see migrations/0001 and `index.py`)."""

from __future__ import annotations

from django.db import models

from dashboard.agents.models import AgentSession


class SearchEntry(models.Model):
    session = models.ForeignKey(AgentSession, on_delete=models.CASCADE, related_name="+")
    seq = models.BigIntegerField()
    kind = models.CharField(max_length=16)  # prompt | assistant | tool | result | error
    text = models.TextField()
    created_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["session", "seq"], name="search_entry_once"),
        ]

    def __str__(self) -> str:
        return f"{self.session_id}#{self.seq} {self.kind}"
