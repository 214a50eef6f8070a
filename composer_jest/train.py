"""``python -m composer_jest.train [recipe.yaml] [key=value ...]`` (and ``composer -n 8 -m composer_jest.train``).

The entry point users type; the work is in :mod:`composer_jest.run.train`.
"""

from composer_jest.run.train import main

if __name__ == '__main__':
    main()
