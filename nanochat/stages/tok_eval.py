"""Compare the trained tokenizer's compression with GPT-2's and GPT-4's.

Compression is bytes of UTF-8 text per token (higher is better), measured on short
news, code, math and Korean samples and on the start of the train and val shards (of
the downloaded web text, or of the named --dataset).
GPT-2 ("gpt2") and GPT-4 ("cl100k_base") come from tiktoken; offline, point
TIKTOKEN_CACHE_DIR at a directory holding tiktoken's cached encoding files.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from nanochat.common import Runtime
from nanochat.config import check, option, to_dict
from nanochat.dataset import parquets_iter_batched
from nanochat.report import log_section
from nanochat.tokenizer import Tokenizer, get_tokenizer

log = logging.getLogger("nanochat.tok_eval")

BASELINES = {"gpt2": "gpt2", "gpt4": "cl100k_base"}  # our label -> tiktoken encoding name

# Hand-written samples, one per kind of text a chat model meets.
NEWS_TEXT = """\
HARBOR CITY, March 3 (Staff report) - The city council voted 7-2 on Tuesday night to \
fund a $48.5 million overhaul of the Eastside water treatment plant, ending a debate \
that had dragged on for almost two years. Officials said construction could start as \
early as September and would take roughly 30 months. "Residents have waited long \
enough for water they can trust," Mayor Lena Ortiz told reporters after the vote. \
Opponents argued the plan leans too heavily on bonds; council member David Park said \
the interest payments alone would reach about $2.1 million a year by 2027. The \
utility's director, Samuel Okafor, countered that repair costs on the 1962-era \
pipes had tripled since 2019 and that delaying again would cost more, not less."""

CODE_TEXT = '''\
import heapq
from dataclasses import dataclass, field


@dataclass(order=True)
class Job:
    priority: int
    name: str = field(compare=False)


def run_jobs(jobs: list[Job], budget: int) -> list[str]:
    """Run the most urgent jobs first until the budget is spent."""
    queue = list(jobs)
    heapq.heapify(queue)
    done = []
    while queue and budget > 0:
        job = heapq.heappop(queue)
        done.append(job.name)
        budget -= 1
    return done


if __name__ == "__main__":
    print(run_jobs([Job(3, "lint"), Job(1, "build"), Job(2, "test")], budget=2))
'''

MATH_TEXT = r"""\begin{theorem}
For every integer $n \ge 1$, $\sum_{k=1}^{n} (2k-1) = n^2$.
\end{theorem}
\begin{proof}
We argue by induction on $n$. For $n = 1$ both sides equal $1$. Suppose the claim holds
for some $n$. Then
\[
  \sum_{k=1}^{n+1} (2k-1) = n^2 + 2(n+1) - 1 = n^2 + 2n + 1 = (n+1)^2,
\]
so it holds for $n+1$ as well. Geometrically, adding the odd number $2n+1$ to an
$n \times n$ square fills the L-shaped border of an $(n+1) \times (n+1)$ square.
\end{proof}
Example: $1 + 3 + 5 + 7 + 9 = 25 = 5^2$, and $\int_0^1 x^2\,dx = \tfrac{1}{3}$."""

KOREAN_TEXT = """\
오늘 아침 서울의 기온은 영하 5도까지 떨어졌지만, 오후에는 햇살이 비치면서 \
포근한 날씨가 이어졌다. 기상청은 이번 주말부터 다시 찬 공기가 내려와 \
전국적으로 추위가 시작될 것이라고 예보했다. 시민들은 두꺼운 외투를 꺼내 입고 \
출근길에 나섰으며, 지하철역 주변에는 따뜻한 음료를 사려는 사람들로 붐볐다. \
전문가들은 갑작스러운 기온 변화에 대비해 건강 관리에 각별히 신경 써야 한다고 조언했다."""

SAMPLES = [("news", NEWS_TEXT), ("code", CODE_TEXT), ("math", MATH_TEXT), ("korean", KOREAN_TEXT)]


@dataclass
class Config:
    shard_chars: int = option(1_000_000, "characters from the start of the train and of the val shards to measure")
    dataset: str | None = option(None, "measure on the named dataset built by `nanochat ingest` instead of the downloaded web text")

    def validate(self) -> None:
        check([] if self.shard_chars > 0 else [f"--shard-chars must be positive, got {self.shard_chars}"])


def _shard_sample(base_dir, split: str, max_chars: int, dataset: str | None = None) -> str:
    """The first documents of a split, joined by newlines, cut to `max_chars`."""
    docs, total = [], 0
    for batch in parquets_iter_batched(split, base_dir, dataset=dataset):
        for doc in batch:
            docs.append(doc)
            total += len(doc) + 1
            if total >= max_chars:
                return "\n".join(docs)[:max_chars]
    return "\n".join(docs)[:max_chars]


def measure(tokenizer: Tokenizer, texts: list[tuple[str, str]]) -> dict[str, dict]:
    """{text name: {"bytes", "tokens", "ratio"}} for one tokenizer."""
    out = {}
    for name, text in texts:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text, f"{name}: decode(encode(text)) != text"
        n_bytes = len(text.encode("utf-8"))
        out[name] = {"bytes": n_bytes, "tokens": len(ids), "ratio": n_bytes / max(len(ids), 1)}
    return out


def format_table(results: dict[str, dict[str, dict]], vocab_sizes: dict[str, int]) -> str:
    """A plain-text table: per text, our tokens and ratio, then each baseline's and how
    many fewer tokens we need than it (positive: ours compresses better)."""
    baselines = [name for name in results if name != "ours"]
    texts = list(results["ours"])
    lines = ["vocab sizes: " + ", ".join(f"{k} {v:,}" for k, v in vocab_sizes.items()),
             "compression = bytes per token (higher is better); 'fewer' = tokens saved by ours vs that baseline"]
    header = f"{'text':<10}{'bytes':>10}{'ours tok':>10}{'ratio':>7}"
    for b in baselines:
        header += f"{b + ' tok':>11}{'ratio':>7}{'fewer':>8}"
    lines += [header, "-" * len(header)]
    for t in texts:
        ours = results["ours"][t]
        row = f"{t:<10}{ours['bytes']:>10,}{ours['tokens']:>10,}{ours['ratio']:>7.2f}"
        for b in baselines:
            base = results[b][t]
            fewer = 100.0 * (base["tokens"] - ours["tokens"]) / max(base["tokens"], 1)
            row += f"{base['tokens']:>11,}{base['ratio']:>7.2f}{fewer:>+7.1f}%"
        lines.append(row)
    return "\n".join(lines)


def run(config: Config, runtime: Runtime) -> dict:
    config.validate()
    tokenizers = {"ours": get_tokenizer(runtime.base_dir)}
    for label, name in BASELINES.items():
        tokenizers[label] = Tokenizer.from_pretrained(name)
    texts = list(SAMPLES)
    for split in ("train", "val"):
        sample = _shard_sample(runtime.base_dir, split, config.shard_chars, config.dataset)
        if sample:
            texts.append((split, sample))
    results = {label: measure(tok, texts) for label, tok in tokenizers.items()}
    vocab_sizes = {label: tok.get_vocab_size() for label, tok in tokenizers.items()}
    for per_text in results.values():
        for r in per_text.values():
            r["ratio"] = round(r["ratio"], 4)
    metrics = {"vocab_sizes": vocab_sizes, "results": results}
    if runtime.is_master:
        table = format_table(results, vocab_sizes)
        print(table, flush=True)
        log_section(runtime.base_dir, "Tokenizer evaluation", {"config": to_dict(config), "table": table, **metrics})
    return metrics
