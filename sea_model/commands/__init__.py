"""The ``sea`` command (:mod:`.cli`) and what its subcommands run: ``sea demo`` (:mod:`.demo`),
``sea inspect`` (:mod:`.figure1`), ``sea lab`` (:mod:`.lab`), ``sea export`` (:mod:`.export`), with the
synthetic shapes that demo and lab draw (:mod:`.shapes`)."""
