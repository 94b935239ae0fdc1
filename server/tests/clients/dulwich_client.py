"""A second git implementation against repofs-server: dulwich clones (full and
shallow), commits, pushes, and fetches. Usage: dulwich_client.py REMOTE_URL WORKDIR
Prints the pushed commit id on success; any failure raises."""
import os
import sys

from dulwich import porcelain
from dulwich.repo import Repo

url, work = sys.argv[1], sys.argv[2]
full = os.path.join(work, "full")
porcelain.clone(url, full, checkout=True)
repo = Repo(full)
os.makedirs(os.path.join(full, "system"), exist_ok=True)
with open(os.path.join(full, "system", "dulwich.md"), "w") as f:
    f.write("---\ndescription: written by dulwich\n---\nhello from dulwich\n")
porcelain.add(repo, [os.path.join(full, "system", "dulwich.md")])
commit = porcelain.commit(repo, message=b"dulwich commit",
                          author=b"Dul Wich <d@example.com>", committer=b"Dul Wich <d@example.com>")
porcelain.push(repo, url, b"refs/heads/main:refs/heads/main")

shallow = os.path.join(work, "shallow")
porcelain.clone(url, shallow, depth=1, checkout=True)
srepo = Repo(shallow)
assert srepo.head() == commit, (srepo.head(), commit)
assert open(os.path.join(shallow, "system", "dulwich.md")).read().endswith("hello from dulwich\n")
print(commit.decode())
