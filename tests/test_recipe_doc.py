"""RECIPE.md is the document the code cites (`recipe.md §N`) and that points back into the code (`file.py:name`).
These tests keep the two in step: every section citation must name a heading that exists, and every code location
the document gives must exist in the code. Pure text and `ast` checks: no imports of the project, no torch."""
import ast
import glob
import os
import re

from conftest import ROOT

RECIPE = os.path.join(ROOT, "RECIPE.md")

# a numbered heading: "## 4. Losses", "### 4.5 KDE regulariser"
HEADING = re.compile(r"^#{2,4} (\d+(?:\.\d+)*)[. ]", re.M)
# "recipe.md §4.5", "RECIPE.md §0, §8", "recipe.md §10.1 and §10.2": the file name, then one or more section
# numbers
CITATION = re.compile(r"\brecipe\.md((?:\s*(?:,|;|/|and)?\s*§\s?\d+(?:\.\d+)*)+)", re.I)
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)*)")
# a code location is a whole backticked span: `train.py:get_args_parser`, `model.py:ViT.forward`,
# `eval_probe.py:PATIENCE`
LOCATION = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*\.py):([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)`")


def recipe_text():
    with open(RECIPE, encoding="utf-8") as f:
        return f.read()


def heading_numbers(text):
    return HEADING.findall(text)


def cited_sections(text, bare=False):
    """Section numbers cited in `text`: after "recipe.md" (any case); with bare=True every "§N" (inside RECIPE.md
    each § is a reference to the document itself)."""
    if bare:
        return SECTION.findall(text)
    return [n for group in CITATION.findall(text) for n in SECTION.findall(group)]


def unresolved_sections(numbers, headings):
    return sorted(set(numbers) - set(headings), key=lambda n: [int(p) for p in n.split(".")])


def _names_in_class(cls):
    names = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)  # dataclass fields
    for node in ast.walk(cls):  # instance attributes: self.<name> = ... in any method
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                        names.add(sub.attr)
    return names


def module_index(path):
    """{top-level name: set of member names (classes) or None} for a Python file: defs, classes, assignments."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    index = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            index[node.name] = None
        elif isinstance(node, ast.ClassDef):
            index[node.name] = _names_in_class(node)
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                for sub in ast.walk(t):
                    if isinstance(sub, ast.Name):
                        index[sub.id] = None
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            index[node.target.id] = None
    return index


def unresolved_locations(text, root=ROOT):
    """(all locations found, the ones that do not exist) for the `file.py:name[.member]` spans in text. The file
    must be at the repository root; name a top-level def / class / assignment; member a method or attribute of
    that class."""
    found = LOCATION.findall(text)
    cache, bad = {}, []
    for fname, ident in found:
        path = os.path.join(root, fname)
        if not os.path.isfile(path):
            bad.append(f"{fname}:{ident} (no such file at the repository root)")
            continue
        if fname not in cache:
            cache[fname] = module_index(path)
        index = cache[fname]
        top, _, member = ident.partition(".")
        if top not in index:
            bad.append(f"{fname}:{ident} ({top} is not defined at the top level of {fname})")
        elif member and (index[top] is None or member not in index[top]):
            bad.append(f"{fname}:{ident} ({member} is not a method or attribute of class {top})")
    return found, bad


def citing_files():
    files = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py")))
    return files + [os.path.join(ROOT, "README.md")]


def test_headings_are_numbered_once_each():
    """Every section number labels exactly one heading (a citation must point at one place), and the document has
    the numbered top-level sections 0 to 13."""
    numbers = heading_numbers(recipe_text())
    dupes = sorted({n for n in numbers if numbers.count(n) > 1})
    assert not dupes, f"section numbers used by more than one heading: {dupes}"
    assert {str(i) for i in range(14)} <= set(numbers)


def test_every_section_citation_resolves():
    """Each `recipe.md §X` in the Python files (top level and tests/) and README.md, and each `§X` inside RECIPE.md,
    names a heading of RECIPE.md numbered X."""
    text = recipe_text()
    headings = heading_numbers(text)
    problems, cited = [], set()
    for path in citing_files():
        with open(path, encoding="utf-8") as f:
            numbers = cited_sections(f.read())
        cited |= set(numbers)
        problems += [f"{os.path.relpath(path, ROOT)}: §{n}" for n in unresolved_sections(numbers, headings)]
    own = cited_sections(text, bare=True)
    cited |= set(own)
    problems += [f"RECIPE.md: §{n}" for n in unresolved_sections(own, headings)]
    assert not problems, "citations with no matching heading in RECIPE.md:\n" + "\n".join(problems)
    # not vacuous: the code cites sections and the document cross-references itself
    assert len(cited) >= 8, f"only {len(cited)} distinct sections cited: {sorted(cited)}"


def test_every_code_location_exists():
    """Each `file.py:name` that RECIPE.md gives exists in the code (checked with ast, without importing it)."""
    found, bad = unresolved_locations(recipe_text())
    assert not bad, "code locations in RECIPE.md that do not exist:\n" + "\n".join(bad)
    assert len(found) >= 30, f"only {len(found)} code locations checked"
    assert len({f for f, _ in found}) >= 6, "locations should cover the main files"


def test_checkers_report_made_up_references():
    """Negative control: the same checkers flag a section that does not exist and locations that do not exist, so
    the tests above cannot pass by finding nothing."""
    headings = heading_numbers(recipe_text())
    fake_citation = "as in " + "recipe" + ".md §99.9, §4.5"  # built here so that this file itself cites nothing
    numbers = cited_sections(fake_citation)
    assert numbers == ["99.9", "4.5"]
    assert unresolved_sections(numbers, headings) == ["99.9"]
    fake_locations = ("`train.py:no_such_function_xyz` `model.py:ViT.no_such_method` `nosuchfile.py:main` "
                      "`loss.py:kde_loss.inner` `train.py:get_args_parser`")
    found, bad = unresolved_locations(fake_locations)
    assert len(found) == 5
    assert [b.split(" ")[0] for b in bad] == ["train.py:no_such_function_xyz", "model.py:ViT.no_such_method",
                                             "nosuchfile.py:main", "loss.py:kde_loss.inner"]
    # the location pattern does not pick up other backticked text
    assert LOCATION.findall("`python train.py --preset demo` `ssl_meta_arch.py` "
                            "`vitg14_reg4.yaml: optim.base_lr`") == []
