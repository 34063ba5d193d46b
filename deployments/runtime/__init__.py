"""What every deployment's replica may use: its name and heap settings, background loops, metrics, error answers,
tensor hand-over through the object store, and the state a Gateway or Orchestrator replica opens at start."""
