"""The site's side of SecAgg+: the same local round, its update masked before it leaves.

In Flower 1.32 SecAgg+ exists for the legacy API only, so this app is a ``NumPyClient``
behind ``secaggplus_mod``: the mod runs the protocol's key exchange and, when the server
asks for the masked vector, calls `SecureSite.fit`, quantises ``num_examples x parameters``
and adds the pairwise and private masks. What the site trains is exactly what the Message
API app trains (`train_locally`: same site, same DP-SGD, same privacy state on disk).

What travels in clear: the fit metrics -- the privacy row (site id, status, epsilon, steps,
noise, sample rate); no training loss under DP. The number of examples is masked along with
the parameters, but the clear sample rate (batch size / images) reveals it anyway.

A site whose budget cannot afford the round does not drop out of the protocol: it reports
the refusal and ``num_examples = 0``, so its masked vector carries zero weight and the sum
is that of the sites that trained. Under client-level DP every site weighs 1 (a refusal
is a zero update), since the noise is sized for a mean over every sampled site. Dropping out would cost the other sites a mask
reconstruction and would lose the refusal's reason; a site that fails (an exception) does
drop out, and the protocol recovers its masks while enough sites (the threshold) remain.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import cached_property

import numpy as np
import torch
from flwr.client import Client, ClientApp, NumPyClient
from flwr.client.mod import adaptiveclipping_mod, fixedclipping_mod, secaggplus_mod
from flwr.common import Context, NDArrays, Scalar

from clients.site_round import (
    Site,
    client_dp_mod_for,
    load_site,
    train_locally,
    validate,
)
from common.models.classifier import build_classifier
from common.runs import UNIT_WEIGHT, AppSettings


def model_with(site: Site, parameters: NDArrays) -> torch.nn.Module:
    """The configured architecture holding `parameters` (in state-dict order, as the server sent them)."""
    config = site.config
    model = build_classifier(config.encoder, norm=config.norm, dropout=config.model.dropout)
    names = model.state_dict().keys()
    model.load_state_dict(OrderedDict((name, torch.from_numpy(np.asarray(array)))
                                      for name, array in zip(names, parameters, strict=True)))
    return model


def parameters_of(model: torch.nn.Module) -> NDArrays:
    return [tensor.detach().cpu().numpy() for tensor in model.state_dict().values()]


class SecureSite(NumPyClient):
    """One site under SecAgg+: `fit` returns its clear update, which secaggplus_mod masks."""

    def __init__(self, context: Context, settings: AppSettings | None) -> None:
        self.context, self.settings = context, settings

    @cached_property
    def site(self) -> Site:
        """Loaded only by `fit` and `evaluate`: the protocol's key-exchange stages need no data."""
        return load_site(self.context, self.settings)

    def fit(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        model = model_with(self.site, parameters)
        metrics, privacy = train_locally(self.site, model, int(config["server-round"]),
                                         proximal_mu=float(config.get("proximal-mu", 0.0)))
        num_examples = int(metrics.pop("num-examples"))
        if self.site.config.federation.client_dp.mode != "off":
            # Client-level DP noises an unweighted mean over every sampled site: a refusal
            # (the global model echoed, a zero update) counts with weight 1 too.
            num_examples = int(metrics[UNIT_WEIGHT])
        return parameters_of(model), num_examples, {**metrics, **privacy}

    def evaluate(self, parameters: NDArrays, config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        metrics = validate(self.site, model_with(self.site, parameters))
        return float(metrics["val_loss"]), len(self.site.val), metrics


def make_secure_client_app(settings: AppSettings | None = None) -> ClientApp:
    """The SecAgg+ ClientApp; client-side clipping (if configured) runs before the masking."""

    def client_fn(context: Context) -> Client:
        return SecureSite(context, settings).to_client()

    client_dp_mod = client_dp_mod_for(settings, {"client-fixed": fixedclipping_mod,
                                                 "client-adaptive": adaptiveclipping_mod})
    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod, client_dp_mod])
