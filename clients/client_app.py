"""The site's Flower ClientApp: a thin shell over the site's round (`clients.site_round`).

Runs with ``federation.secure_aggregation`` go to the SecAgg+ variant
(`clients.secure_aggregation`); client-level DP clipping is applied by Flower's mods when the
run asks for it. Settings come from the run config, or from `AppSettings` handed to
`make_client_app` by ``mammofl simulate``.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod

from clients.secure_aggregation import make_secure_client_app
from clients.site_round import client_dp_mod_for, evaluate_site, train
from common.packed_arrays import packed_arrays_mod
from common.runs import AppSettings, app_config


def make_client_app(settings: AppSettings | None = None) -> ClientApp:
    """The site's ClientApp; `settings` are given by ``mammofl simulate``, else read from the run config."""

    def secure_aggregation_mod(message: Message, context: Context, call_next) -> Message:
        """Runs with ``federation.secure_aggregation`` speak SecAgg+: their messages go to that app."""
        if not app_config(context.run_config, settings).federation.secure_aggregation:
            return call_next(message, context)
        return make_secure_client_app(settings)(message, context)

    client_dp_mod = client_dp_mod_for(settings, {"client-fixed": fixedclipping_mod,
                                                 "client-adaptive": adaptiveclipping_mod})
    # The aggregator's grid packs each ArrayRecord into one Array (`common.packed_arrays`): unpacked
    # first, the reply packed last, so SecAgg+, clipping and the round see and build ArrayRecords.
    app = ClientApp(mods=[packed_arrays_mod, secure_aggregation_mod, client_dp_mod])
    app.train()(lambda message, context: train(message, context, settings))
    app.evaluate()(lambda message, context: evaluate_site(message, context, settings))
    return app


app = make_client_app()
