"""Research tools built on tuco_lens: not part of the library's API, imported on demand.

What lives here uses the library (a :class:`~tuco_lens.TuCoPair`, its tokenizer and hooks) to
produce *inputs* for an analysis rather than being one of the paper's measurements itself, so it
is kept off the core import path: ``import tuco_lens`` (and ``import tuco_lens.analyses``) never
imports ``tuco_lens.contrib``; import it yourself when you need it
(``from tuco_lens.contrib import suffix_search``).

- :func:`~tuco_lens.contrib.suffix_search.suffix_search` — a small GCG-style adversarial-suffix
  search lowering the log-probability of a refusal, for models without published attack strings
  (the demo report uses it for the §5.3 suffix row); :class:`SuffixSearchResult` is its result,
  :func:`suffix_gradient` the one-hot gradient it follows, :func:`target_logprobs` scores any
  prompt's ``log p(target | prompt)`` and :func:`default_allowed_tokens` is its default
  candidate vocabulary.

Example:
    >>> from tuco_lens.contrib import target_logprobs
    >>> prompts = [demo.render_chat([{"role": "user", "content": "hello , describe the doomsalt ."}])]
    >>> [round(v, 3) for v in target_logprobs(pair, prompts, demo.REFUSAL).tolist()]
    [-0.114]
"""

from tuco_lens.contrib.suffix_search import (
    SuffixSearchResult,
    default_allowed_tokens,
    suffix_gradient,
    suffix_search,
    target_logprobs,
)

__all__ = [
    "suffix_search",
    "SuffixSearchResult",
    "suffix_gradient",
    "target_logprobs",
    "default_allowed_tokens",
]
