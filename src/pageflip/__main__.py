"""``python -m pageflip``: the pageflip command."""

from .cli import main

main()
