"""Training on the cache. The modules here are the commands (`python -m train.run`, `train.evaluate`,
`train.predict`, `train.cv`, `train.compare`, `train.preview`, `train.bench`), each a thin `main(argv)`; the library
is in the rooms below (data, augment, engine, evaluation, experiment), whose one-way imports a
layering test holds (ARCHITECTURE.md draws them)."""
