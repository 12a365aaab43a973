"""The aggregator's Flower ServerApp: a thin shell that picks the federation and delegates.

A run's config chooses plain rounds (`server.federation.Federation`) or SecAgg+ rounds
(`server.secure_aggregation.SecureFederation`); both write the same run directory.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.runs import AppSettings, RunDirectory, app_config
from common.training import seed_everything
from server.federation import Federation, RoundObserver, UpdateObserver, settings_for
from server.prompt_grid import PromptGrid
from server.secure_aggregation import SecureFederation


def make_server_app(settings: AppSettings | None = None, *, observer: RoundObserver | None = None,
                    update_observer: UpdateObserver | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        grid = PromptGrid(grid)  # replies as they arrive, not at Flower's 3 s polling steps
        resolved = settings_for(context, settings)
        config = app_config(context.run_config, settings)
        seed_everything(config.seed)
        run = RunDirectory(resolved.run_dir)
        run.model_dir.mkdir(parents=True, exist_ok=True)
        if not (run.root / "config.json").exists():
            run.write_config(config)
        if config.federation.secure_aggregation:
            SecureFederation(grid, context, config, run, observer=observer,
                             update_observer=update_observer).run_rounds()
        else:
            Federation(grid, config, run, observer=observer, update_observer=update_observer).run_rounds()

    return app


app = make_server_app()
