"""python generate.py [key=value ...]: the `imgaug-gen generate` console script, run from a clone."""

from imgaug_gen.cli import generate_main

if __name__ == "__main__":
    generate_main()
