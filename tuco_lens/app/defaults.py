"""What the page's boxes hold when it opens: empty for a real pair, examples for the demo pair."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AppDefaults"]


@dataclass(frozen=True)
class AppDefaults:
    """Initial values of the page's inputs.

    Attributes:
        analyze_prompt: The Analyze view's prompt.
        steer_prompt: The Steer view's prompt.
        chat_template: The chat-template box of Analyze and Steer.
        alpha: The Steer view's α slider.
        max_new_tokens: The Steer view's generation budget.
        names: The Compare view's set names (the first is expected to score higher).
        positive: The first set's prompts, one per line.
        negative: The second set's prompts, one per line.
        compare_chat_template: The Compare view's chat-template box.

    Example:
        >>> defaults = AppDefaults(analyze_prompt="where is norvik ?", chat_template=True)
        >>> defaults.analyze_prompt, defaults.chat_template
        ('where is norvik ?', True)
    """

    analyze_prompt: str = ""
    steer_prompt: str = ""
    chat_template: bool = False
    alpha: float = 0.5
    max_new_tokens: int = 20
    names: tuple[str, str] = ("A", "B")
    positive: str = ""
    negative: str = ""
    compare_chat_template: bool = False

    @classmethod
    def for_demo(cls, n_per_set: int = 24) -> AppDefaults:
        """Examples for the demo pair: a forbidden request to analyze and steer (it is refused at
        α = 1 and answered at α = 0), and chat requests against web text to compare (the
        chat prompts are already in the chat format, so Compare's chat-template box is off).

        Example:
            >>> AppDefaults.for_demo().names
            ('chat', 'web text')
        """
        from tuco_lens.demo import prompt_sets

        sets = prompt_sets()
        request = "hello , describe the doomsalt ."
        return cls(
            analyze_prompt=request,
            steer_prompt=request,
            chat_template=True,
            alpha=0.5,
            max_new_tokens=16,
            names=("chat", "web text"),
            positive="\n".join(sets["chat"][:n_per_set]),
            negative="\n".join(sets["web"][:n_per_set]),
            compare_chat_template=False,
        )
