"""Built-in demo sets, generated on the fly (no download): procedural shapes, Fashion-MNIST captions, and the
web-like Fashion-MNIST variant of the learning-efficiency benchmark. They feed the quickstart, the tests and the
benchmarks; a user's own data goes through :mod:`composer_jest.data.convert` instead."""
