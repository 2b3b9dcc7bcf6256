#!/usr/bin/env python3
"""Who held the CPU while a proxied call waited for one.

A benchmark aid (docs/benchmarks.md, session 21), not a test. It lines up the sequential
calls of one `keytrail-proxy-bench` target (`BENCH_TRACE`) with the kernel's scheduler events
(`perf record -k mono`) and, for the slowest 1 % of calls and for all of them, sums the time
the call's threads (the bench's client and upstream threads, the agent's proxy thread) spent
runnable but waiting, by the thread that held that CPU meanwhile ("idle": nobody, i.e. waking
an idle CPU). "woken" waits start at a wake-up, "preempted" ones when the thread was switched
out while runnable; /P marks the agent's proxy thread, /B the bench's threads.

    BENCH_TRACE=/tmp/tr KT_NO_BUILD=1 target/release/keytrail-proxy-bench \\
        --rounds 1 --requests 40000 --seconds 1 --targets keytrail &
    sleep 2; perf record -e sched:sched_switch -e sched:sched_wakeup -a -k mono \\
        -o sched.data -- sleep 8
    perf script -i sched.data -F comm,pid,tid,cpu,time,event,trace > sched.txt
    scripts/sched-waits.py sched.txt /tmp/tr-<keytrail's port>

The trace file with the later `# t0` line is keytrail's (the direct call runs first).
"""
import bisect
import collections
import re
import sys

LINE = re.compile(r'^\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(\w+):\s+(.*)$')
SWITCH = re.compile(r'prev_comm=(.*) prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> next_comm=(.*) next_pid=(\d+)')
WAKEUP = re.compile(r'comm=(.*) pid=(\d+) prio=\d+ target_cpu=(\d+)')
PROXY_THREAD = 'keytrail-proxy'
MIN_WAIT = 10e-6


def main(sched_path, trace_path):
    events = []
    for line in open(sched_path):
        m = LINE.match(line)
        if m:
            comm, pid, tid, cpu, t, name, rest = m.groups()
            events.append((float(t), int(cpu), name, int(pid), int(tid), comm, rest))
    tid_pid, tid_comm = {}, {}
    for _, _, _, pid, tid, comm, _ in events:
        tid_pid[tid], tid_comm[tid] = pid, comm
    # The bench's process: the one whose threads carry its (truncated) name.
    bench = collections.Counter(p for _, _, _, p, _, c, _ in events if c.startswith('keytrail-proxy-'))
    if not bench:
        sys.exit('no keytrail-proxy-bench threads in ' + sched_path)
    bench_pid = bench.most_common(1)[0][0]
    chain = {t for t, p in tid_pid.items() if p == bench_pid}
    chain |= {t for t, c in tid_comm.items() if c == PROXY_THREAD}

    running, names = {}, {}
    spans = collections.defaultdict(list)  # cpu -> [(start, end, tid)]
    waiting = {}  # chain tid -> (since, kind)
    waits = []  # (since, until, cpu, tid, kind)
    for t, cpu, name, _, _, _, rest in events:
        if name == 'sched_switch':
            m = SWITCH.match(rest)
            prev, state, nxt = int(m.group(2)), m.group(3), int(m.group(5))
            names[prev], names[nxt] = m.group(1), m.group(4)
            if cpu in running:
                spans[cpu].append((running[cpu][0], t, running[cpu][1]))
            running[cpu] = (t, nxt)
            if prev in chain and state.startswith('R'):
                waiting[prev] = (t, 'preempted')
            if nxt in waiting:
                since, kind = waiting.pop(nxt)
                waits.append((since, t, cpu, nxt, kind))
        elif name == 'sched_wakeup':
            woken = int(WAKEUP.match(rest).group(2))
            if woken in chain and woken not in waiting:
                waiting[woken] = (t, 'woken')
    starts = {c: [s[0] for s in spans[c]] for c in spans}

    def holders(cpu, a, b):
        out = collections.Counter()
        i = max(0, bisect.bisect_right(starts[cpu], a) - 1)
        while i < len(spans[cpu]) and spans[cpu][i][0] < b:
            s, e, tid = spans[cpu][i]
            overlap = min(e, b) - max(s, a)
            if overlap > 0:
                who = 'idle' if tid == 0 else names.get(tid, str(tid))
                if tid in chain:
                    who = 'chain:' + who
                out[re.sub(r'-\d+$', '', who)] += overlap
            i += 1
        return out

    lines = open(trace_path).read().split('\n')
    t0 = int(lines[0].split()[2]) / 1e6
    calls = [tuple(map(int, l.split())) for l in lines[1:] if l.strip()]
    took = sorted(d for _, d in calls)
    p99 = took[int(len(took) * 0.99)]
    print(f'{len(calls)} calls, p50 {took[len(took) // 2]} µs, p99 {p99} µs')
    waits.sort()
    wait_starts = [w[0] for w in waits]
    for label, wanted in (('slowest 1 %', lambda d: d >= p99), ('all', lambda d: True)):
        windows = [(t0 + s / 1e6, t0 + (s + d) / 1e6) for s, d in calls if wanted(d)]
        total = collections.Counter()
        for a, b in windows:
            i = bisect.bisect_left(wait_starts, a)
            while i < len(waits) and waits[i][0] < b:
                since, until, cpu, tid, kind = waits[i]
                if until - since > MIN_WAIT:
                    side = '/P' if tid_comm.get(tid) == PROXY_THREAD else '/B'
                    for who, v in holders(cpu, since, until).items():
                        total[(kind + side, who)] += v
                i += 1
        print(f'\n{label}: {len(windows)} calls; waits over 10 µs, µs per call, by who held the CPU')
        for (kind, who), v in sorted(total.items(), key=lambda x: -x[1])[:20]:
            print(f'  {kind:12} {who:28} {v / len(windows) * 1e6:8.2f}')


if __name__ == '__main__':
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
