"""kube-bridge: Kubernetes as jobtree's front door (issue 7).

Contract: `jobtree serve kube-bridge [--kubeconfig FILE] [--cluster C] [--node-grace S]
[--pod-grace S]` (in-cluster configuration when there is no kubeconfig) is a level-based
controller between one Kubernetes API server and one jobtree cluster:
- it keeps informers (list + watch with resourceVersion, relist on 410; `kube.Informer`) of
  Namespaces, Budgets, Runs, Nodes, and the Pods, GPULeases and Reservations it labels; each
  change puts a key (a run, a budget, a node) on a bounded work queue with rate-limited retries
  (`kube.WorkQueue`), and so does every ledger batch its follower applies;
- **in**: a Run or Budget object is sent to admission as ApplyRun/ApplyBudget under a command
  id derived from its uid and generation (`objects.run_command_id`), only when the ledger does
  not already hold that id: a restarted bridge converges and admission decides each generation
  once. Deleting a Run object (or replacing it by one with a new uid) deletes the run. Nodes
  with `nvidia.com/gpu` allocatable become jobtree nodes (region, fabric domain, flavor from
  labels — see docs/operator-guide/topology.md); `spec.unschedulable` cordons, Ready=False past
  `--node-grace` seconds, the out-of-service taint or deletion fences. All of a run's pods
  Succeeded completes it; a pod Failed fails it;
- **owners can not be forged**: a namespace is bound to an owner by its annotation
  `rq.davidlangworthy.io/owner`; a Run may omit spec.owner (it takes the namespace's) or name
  that owner or a descendant (by the budgets' parents); anything else is refused with
  condition Admitted=False reason OwnerForbidden, and nothing is sent to admission;
- **out**: the Run's status (phase, width, funding, `explain` words as message,
  observedGeneration) and conditions Admitted, Running, Reserved, Preempted, Completed, Failed
  through the status subresource with conflict retries; one GPULease object per lease (created
  once, status set when it closes), one Reservation object per reservation, Budget status
  (headroom), Events on Runs (admitted, reserved, preempted with the seed, swapped, requeued,
  completed, failed, refused); workload pods for open Active leases (`objects.pods_for_lease`,
  docs/design/workload-pods.md) and a headless Service per run; pods of a closed lease are
  deleted with `--pod-grace` seconds to stop.
Not: a decision maker (admission decides), not a writer of the ledger.
"""

from __future__ import annotations

import os

from jobtree.bus.follower import follow
from jobtree.bus.runtime import ServiceContext

ENV_KUBECONFIG = "JOBTREE_KUBECONFIG"
ENV_NODE_GRACE = "JOBTREE_NODE_GRACE"
ENV_POD_GRACE = "JOBTREE_POD_GRACE"


async def main(ctx: ServiceContext) -> None:
    from jobtree.services.kube_bridge.bridge import Bridge
    from jobtree.services.kube_bridge.kube import Kube

    follower = await follow(ctx)
    if follower is None:
        return
    kube = await Kube.connect(os.environ.get(ENV_KUBECONFIG) or None)
    bridge = Bridge(ctx, kube, follower, node_grace=float(os.environ.get(ENV_NODE_GRACE, "40")),
                    pod_grace=int(os.environ.get(ENV_POD_GRACE, "30")))
    ctx.log.info("bridging", extra={"fields": {"cluster": ctx.cluster,
                                               "kubeconfig": os.environ.get(ENV_KUBECONFIG) or "in-cluster"}})
    try:
        await bridge.run()
    finally:
        await follower.stop()
        await kube.close()
