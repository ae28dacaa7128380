"""The qempo-lite Gradio app: adapters of one base model side by side, with their diversity.

    python app/app.py [OPTIONS]      # the same as `qempo-lite app [OPTIONS]`
    gradio app/app.py                # auto-reload while editing, on the default settings

The app itself lives in :mod:`qempo_lite.app` so that the installed ``qempo-lite app``
command works without this source tree; see ``qempo-lite app --help`` for the options.
"""

import sys

if __name__ == "__main__":
    from qempo_lite.cli import main

    raise SystemExit(main(["app", *sys.argv[1:]]))
else:  # `gradio app/app.py` looks for a Blocks named `demo`
    from qempo_lite.app import build_app, discover_settings

    demo = build_app(discover_settings())
