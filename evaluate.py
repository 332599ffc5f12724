"""python evaluate.py [key=value ...]: the `imgaug-gen evaluate` console script, run from a clone."""

from imgaug_gen.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
