"""`python -m loadtests.bench`: what `gateway bench` runs."""

from loadtests.bench.cli import main

if __name__ == "__main__":
    main()
