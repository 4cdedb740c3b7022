"""Entry point for `python -m aigc_cli`."""

from aigc_cli.frontends.cli.app import main

if __name__ == "__main__":
    main()
