import sys

from slim_ray.cli import main

if __name__ == "__main__":
    sys.exit(main())
