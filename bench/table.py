#!/usr/bin/env python3
"""The README's performance tables from bench/results/*.json (bench/run.sh prints them)."""
import json
import pathlib
import sys

ORDER = ["null-n1", "null-n10", "null-n100", "null-n500", "ebs-n1", "ebs-n10", "ebs-n100",
         "ebs-delays-n1", "ebs-delays-n10", "ebs-delays-n100", "pipeline-cron-n100", "pipeline-source-n100"]


def load(dir_):
    rows = {p.stem: json.loads(p.read_text()) for p in pathlib.Path(dir_).glob("*.json")}
    return [rows[k] for k in ORDER if k in rows] + [v for k, v in sorted(rows.items()) if k not in ORDER]


def f(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def main(dir_):
    everything = load(dir_)
    rows = [r for r in everything if "builds" in r]
    idle = [r for r in everything if "pipelines" in r]
    print("| scenario | builds ok | wall s | builds/min | transition p50 / p99 / max ms "
          "| of which queued p99 / status write p99 ms | apiserver reads / writes per build "
          "| writes per step (kiln's own / events) | EC2 calls per build | operator peak RSS MiB "
          "| operator CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, b = r["transition_ms"], r.get("transition_breakdown_ms") or {}
        verbs = r["apiserver_per_build"]["by_verb"]
        events = sum(v for k, v in verbs.items() if k.endswith(" events"))
        writes = r["apiserver_per_build"]["writes"]
        steps = r["steps_per_build"] or 1
        wall = f(r["wall_seconds"], 2)
        if r.get("wall_over_delays"):
            wall += f" ({r['wall_over_delays']:.2f}x the {r['injected_delays_seconds']:.0f} s of delays)"
        ec2 = r.get("ec2_calls_per_build") or {}
        print(f"| {r['scenario']} | {r['succeeded']}/{r['builds']} | {wall} | {f(r['builds_per_minute'])} "
              f"| {f(t['p50'])} / {f(t['p99'])} / {f(t['max'])} "
              f"| {f((b.get('queued') or {}).get('p99'))} / {f((b.get('status_write') or {}).get('p99'))} "
              f"| {f(r['apiserver_per_build']['reads'])} / {f(writes)} "
              f"| {f((writes - events) / steps, 2)} / {f(events / steps, 2)} "
              f"| {f(ec2.get('total'))} | {f(r['operator']['peak_rss_mib'])} | {f(r['operator']['cpu_seconds'], 2)} |")
    print()
    print("| scenario | machine busy (of capacity) CPU s | apiserver + etcd | sshd and the builds' commands "
          "| EC2 server | operator |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        c = r.get("cpu_seconds")
        if not c:
            continue
        print(f"| {r['scenario']} | {f(c['machine_busy'])} ({f(c['machine_capacity'])}) "
              f"| {f(c['apiserver_and_etcd'])} | {f(c['sshd'])} | {f(c['ec2_server'])} "
              f"| {f(r['operator']['cpu_seconds'])} |")
    if idle:
        idle_table(idle)


def idle_table(rows):
    """The idle-pipeline scenarios: what one pipeline costs per hour when nothing changes."""
    print()
    print("Idle pipelines, per pipeline per hour of the window (WATCH: the watches' reconnects, "
          "the same whatever the number of pipelines):")
    print()
    print("| scenario | at version 1 / builds in the window | window s | apiserver writes / reads (of which WATCH) "
          "| reads and writes by verb, WATCH aside | status writes | reconciles | EC2 calls | operator CPU s "
          "| operator CPU for all, of a core |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        h = r["per_pipeline_per_hour"]
        api = h["apiserver"]
        watch = sum(v for k, v in api["by_verb"].items() if k.startswith("WATCH "))
        verbs = ", ".join(f"{k} {v:g}" for k, v in sorted(api["by_verb"].items(), key=lambda kv: -kv[1])
                          if not k.startswith("WATCH ")) or "-"
        rec = sum(v for k, v in h["reconciles"].items() if 'controller="imagepipeline"' in k)
        ec2 = h.get("ec2_calls") or {}
        print(f"| {r['scenario']} | {r['pipelines_at_version_1']}/{r['pipelines']} / {r['builds_started_in_window']} "
              f"| {f(r['window_seconds'], 0)} | {f(api['writes'], 2)} / {f(api['reads'], 2)} ({f(watch, 2)}) "
              f"| {verbs} | {f(h['status_writes'], 2)} | {f(rec, 2)} | {f(ec2.get('total'), 2)} "
              f"| {f(h['operator_cpu_seconds'], 3)} | {f(r['operator']['cpu_percent_of_a_core'], 2)} % |")

if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent / "results")
