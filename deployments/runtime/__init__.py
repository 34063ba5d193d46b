"""What every deployment's replica may use: its name and heap settings, background loops, work awaited to its end by a cancelled caller, metrics, error answers,
tensor hand-over through the object store, and the state a Gateway or Orchestrator replica opens at start."""
