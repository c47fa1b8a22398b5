"""`make bench`: our stages against TRL's trainers, and our sampler against `generate`."""
