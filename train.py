"""python train.py [key=value ...]: the `imgaug-gen train` console script, run from a clone."""

from imgaug_gen.cli import train_main

if __name__ == "__main__":
    train_main()
