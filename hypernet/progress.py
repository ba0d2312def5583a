"""What every long step of the library reports to: `Progress(done, total)`. The CLI passes a
`tooling.progress.ProgressLine`'s update, the ComfyUI nodes their progress bar; None reports nothing.
(Kept on the ground floor: methods, merge and node logic all import it.)"""

from collections.abc import Callable

Progress = Callable[[int, int], None]
