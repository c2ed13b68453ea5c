"""`python -m ccsmerge.methods`: write the registry's method table into README.md."""

import sys
from pathlib import Path

from . import method_table

readme = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
text = readme.read_text()
begin, end = "<!-- methods:begin -->\n", "<!-- methods:end -->"
head, rest = text.split(begin, 1)
readme.write_text(head + begin + method_table() + end + rest.split(end, 1)[1])
