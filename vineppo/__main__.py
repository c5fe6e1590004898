"""`python -m vineppo` is `python -m vineppo.train`."""

from vineppo.train import main

if __name__ == "__main__":
    main()
