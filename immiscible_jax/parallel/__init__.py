"""Where arrays live across devices and processes: layouts, device prefetch, preemption and cross-process agreement."""
