"""Throughput of `gemma3 serve --ray` with 1 and with 2 replicas (1 thread each) on the same
request mix: the local Ray cluster `gemma3 serve --ray` starts (serve_ray.start_local), the same
concurrent greedy completions sent through the ingress with the openai client, completion tokens
per second of wall time. --cpu adds the CPU seconds of each kind of process (Ray's services, the
proxy, controller, ingress, replicas, the clients) over each configuration's rounds, and the
share of a replica's CPU its two busiest threads took (a replica held to 1 thread runs its model
on one: the engine's).

usage: PYTHONPATH=src python scripts/bench_replicas.py [--requests 32] [--concurrency 16]
       [--max-tokens 64] [--rounds 5] [--niceness 15] [--cpu] [--json]

The default mix keeps 16 requests in flight: twice a replica's batch (--max-batch 8), so that one
replica is saturated and the second has work of its own. At 8 in flight one replica batches them
all, and a second replica gains only what a batch of 4 steps faster than one of 8 (docs/serving.md).

Both configurations are deployed side by side (two Ray Serve applications, /r1 and /r2; an idle
replica only wakes once a second) and warmed up with one request per replica; then their rounds
alternate (1, 2, 1, 2, ...) so that a change in the machine's other load hits both alike. The
figure is each one's best round (and the ratio of their median rounds); every round is reported,
with the requests each replica served. 2 replicas need 2 free cores.
"""

import argparse
import json
import os
import socket
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three laws of thermodynamics are", "A good recipe for bread starts with",
           "In 1969, the first humans to walk on the Moon", "SELECT name FROM users WHERE",
           "The most important idea in economics is"]


def run_mix(client, model, requests, concurrency, max_tokens) -> tuple[int, float, list[int]]:
    """(completion tokens, seconds, requests each replica served, most first) for `requests`
    completions, `concurrency` at a time."""
    def one(i):
        raw = client.completions.with_raw_response.create(model=model, prompt=PROMPTS[i % len(PROMPTS)],
                                                          max_tokens=max_tokens, temperature=0)
        return raw.parse().usage.completion_tokens, raw.headers.get("x-gemma3-replica", "?").split("@")[0]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, range(requests)))
    seconds = time.perf_counter() - start
    served = Counter(replica for _, replica in answers)
    return sum(tokens for tokens, _ in answers), seconds, sorted(served.values(), reverse=True)


def cpu_by_process() -> dict[int, tuple[str, float, dict[int, float]]]:
    """{pid: (role, CPU seconds so far (user + system), {thread id: CPU seconds} of a replica)} of
    this driver and every process under it (Ray's services, its proxy, controller and replicas)."""
    import psutil

    me = psutil.Process()
    seconds = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            with proc.oneshot():
                cmd, times = proc.cmdline(), proc.cpu_times()
                role = "driver (clients)" if proc.pid == me.pid else role_of(" ".join(cmd))
                threads = {t.id: t.user_time + t.system_time for t in proc.threads()} if "Replica" in role else {}
        except psutil.Error:
            continue
        seconds[proc.pid] = role, times.user + times.system, threads
    return seconds


def busiest_threads(before, after, role: str) -> list[float]:
    """Shares of its process's CPU that the two busiest threads of `role`'s busiest process took
    between two cpu_by_process() snapshots: a replica held to 1 thread runs on one (the engine's)."""
    best, shares = 0.0, []
    for pid, (r, used, threads) in after.items():
        old = before.get(pid, (r, 0.0, {}))
        if r != role or used - old[1] <= best:
            continue
        best = used - old[1]
        deltas = sorted((s - old[2].get(tid, 0.0) for tid, s in threads.items()), reverse=True)
        shares = [d / best for d in deltas[:2]]
    return shares


def role_of(cmd: str) -> str:
    """A process's role from its command line: a Ray actor's title without the method it runs
    now (ray::ServeReplica:r2:Replica, ray::ServeController), else the program (raylet, ...)."""
    if cmd.startswith("ray::"):
        return cmd.split()[0].removeprefix("ray::").split(".")[0]
    return Path(cmd.split()[0]).name if cmd else "?"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", default=None, help="as gemma3 serve --model (default: the embedded 270M)")
    p.add_argument("--cpu", action="store_true",
                   help="also report the CPU seconds each kind of process spent per configuration's rounds")
    p.add_argument("--niceness", type=int, default=15,
                   help="nice value of Ray's workers (Ray's default: 15; 0 competes with other processes as equals)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import openai
    import ray
    from ray import serve

    from gemma3.cli import ray_app, serve_ray
    load_before = os.getloadavg()
    report_to = sys.stdout
    sys.stdout = sys.stderr  # Ray's own messages (its driver prints to stdout) stay off the report
    # 3 logical CPUs: the 1-replica and the 2-replica application stay deployed together, and only
    # one of them is sent work at a time. Ray starts its workers (replicas, proxy) at nice 15, below
    # everything else on the machine, its own services and this driver's clients included: on a
    # machine with other work, the configuration that keeps both cores busy then loses the most.
    serve_ray.start_local(num_cpus=3, log_to_driver=False, _system_config={"worker_niceness": args.niceness})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    model_flag = f"--model {args.model} " if args.model else ""
    configs, rounds, cpu, served, threads = (1, 2), {1: [], 2: []}, {1: {}, 2: {}}, {1: [], 2: []}, {1: [], 2: []}
    try:
        clients = {}
        for replicas in configs:
            serve.run(ray_app.build({"argv": f"{model_flag}--replicas {replicas} --threads 1 --ctx 1024"}),
                      name=f"r{replicas}", route_prefix=f"/r{replicas}")
            clients[replicas] = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/r{replicas}/v1", api_key="none",
                                              max_retries=0, timeout=600)
        model = clients[1].models.list().data[0].id
        for replicas in configs:
            run_mix(clients[replicas], model, replicas, replicas, 4)  # warm-up: one request per replica
        for _ in range(args.rounds):
            for replicas in configs:
                before = cpu_by_process() if args.cpu else {}
                tokens, seconds, counts = run_mix(clients[replicas], model, args.requests, args.concurrency,
                                                  args.max_tokens)
                rounds[replicas].append(tokens / seconds)
                served[replicas].append(counts)
                after = cpu_by_process() if args.cpu else {}
                for pid, (role, used, _) in after.items():
                    cpu[replicas][role] = cpu[replicas].get(role, 0.0) + used - before.get(pid, (role, 0.0))[1]
                if args.cpu:
                    threads[replicas].append(busiest_threads(before, after, f"ServeReplica:r{replicas}:Replica"))
    finally:
        serve.shutdown()
        ray.shutdown()
        sys.stdout = report_to
    results = [{"replicas": r, "threads_per_replica": 1, "tokens_per_s": round(max(rounds[r]), 2),
                "rounds_tokens_per_s": [round(x, 2) for x in rounds[r]], "requests_per_replica": served[r]}
               for r in configs]
    if args.cpu:
        for r in results:
            r["replica_thread_shares"] = [[round(x, 3) for x in shares] for shares in threads[r["replicas"]]]
            r["cpu_s"] = {role: round(s, 2) for role, s in sorted(cpu[r["replicas"]].items(), key=lambda kv: -kv[1])
                          if s >= 0.05}
    if not args.json:
        for r in results:
            print(f"{r['replicas']} replica(s) x 1 thread: {r['tokens_per_s']:.1f} tokens/s "
                  f"(rounds: {', '.join(f'{x:.1f}' for x in r['rounds_tokens_per_s'])})")
            print("  requests per replica by round: " + ", ".join("/".join(map(str, c))
                                                                 for c in r["requests_per_replica"]))
            if args.cpu:
                print("  CPU s over its rounds: " + ", ".join(f"{role} {s:.1f}" for role, s in r["cpu_s"].items()))
                print("  a replica's two busiest threads, share of its CPU by round: " + ", ".join(
                    "/".join(f"{x:.0%}" for x in shares) for shares in r["replica_thread_shares"]))
    speedup = results[1]["tokens_per_s"] / results[0]["tokens_per_s"]
    median_speedup = statistics.median(rounds[2]) / statistics.median(rounds[1])
    report = {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "worker_niceness": args.niceness,
              "cpu_count": os.cpu_count(), "load_average_before": load_before, "results": results,
              "speedup_2_over_1": round(speedup, 3), "median_rounds_speedup_2_over_1": round(median_speedup, 3)}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"2 replicas / 1 replica: {speedup:.2f}x (median rounds: {median_speedup:.2f}x; load average before: "
              f"{', '.join(f'{x:.1f}' for x in load_before)} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
