"""`python -m bertode.evaluate checkpoint=DIR`: MLM or next-token loss, perplexity and accuracy of a
saved model (the command lives in `bertode.training.evaluate`)."""

from .training.evaluate import main, run

__all__ = ["main", "run"]

if __name__ == "__main__":
    main()
