# escape=`
FROM mcr.microsoft.com/windows/servercore
WORKDIR C:\app
RUN dir `
    C:\ && `
    echo done
COPY a.txt C:\app\
