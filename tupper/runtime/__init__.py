"""The orchestrator (every container verb), per-container records, process supervision, store check."""
