"""M²oT: several teachers, and experts that specialise by teacher (work in progress)."""

import torch
import torch.nn as nn


class TeacherAwareRouter(nn.Linear):
    """π of one MoE layer: Linear(D -> E·N_T), softmax over teachers; π(x): (..., E, N_T)."""

    def __init__(self, dim, num_experts, num_teachers):
        super().__init__(dim, num_experts * num_teachers, bias=False)
        self.num_experts, self.num_teachers = num_experts, num_teachers
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x):
        logits = super().forward(x).unflatten(-1, (self.num_experts, self.num_teachers))
        return logits.float().softmax(dim=-1)  # (..., E, N_T): each expert's teacher mixture


def load_mix_routers(state, num_experts):
    """The π of every MoE layer from a checkpoint's "m2ot" state (keys pi.{j}.weight); None
    when the run had none (a dense or Soft MoE multi-teacher student)."""
    weights = [state[k] for k in sorted((k for k in state if k.startswith("pi.")),
                                        key=lambda k: int(k.split(".")[1]))]  # fmt: skip
    if not weights:
        return None
    routers = nn.ModuleList()
    for w in weights:
        r = TeacherAwareRouter(w.shape[1], num_experts, w.shape[0] // num_experts)
        r.weight.data.copy_(w)
        routers.append(r)
    return routers
