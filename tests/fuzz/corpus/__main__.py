"""`python -m tests.fuzz.corpus`: the number of cases per surface."""

from tests.fuzz.corpus import counts

if __name__ == "__main__":
    table = counts()
    for surface, count in table.items():
        print(f"{surface:<12} {count}")
    print(f"{'total':<12} {sum(table.values())}")
