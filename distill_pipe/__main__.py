from distill_pipe.cli import main

main()
